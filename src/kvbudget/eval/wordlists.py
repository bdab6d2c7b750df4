"""English word lists for synthetic tasks: adjectives, nouns and verbs (lowercase, one word each).

RULER's reference generator draws its keys ("adjective-noun") and its common-words lists from the
`wonderwords` package; these lists are ours (everyday words, 1.7k distinct), so the exact words
differ from the reference while their kind (real English words of each class) is the same.
"""

from __future__ import annotations

ADJECTIVES: tuple[str, ...] = tuple("""
able absent active actual acute adorable afraid agile alert alive amber ample ancient angry annual anxious
aquatic arctic ardent arid aromatic artful ashen awake aware awful awkward bad bald balmy bare basic bashful
bent bitter bland blank bleak blind blissful blond blue blunt bold bony boring bossy bouncy brave breezy brief
bright brisk broad broken bronze brown bubbly bulky bumpy burly busy calm candid capable careful careless
casual cautious central certain charming cheap cheerful chilly chubby circular civil classic clean clear
clever close cloudy clumsy coastal cold colossal common complex concrete confused cool copper cordial corrupt
cosmic costly cozy crafty cranky crazy creamy creative crimson crisp crooked crowded cruel crunchy cubic
curious curly curved cute daily damp dark dazzling dear decent deep defiant delicate dense dental desert
devoted digital dim direct dirty distant dizzy double drab dreary dry dual dull dusty eager early earnest easy
edible elastic elderly electric elegant eloquent empty endless enormous equal eternal even evident exact
exotic expert faded faint fair faithful false famous fancy fast fatal feeble fertile festive fierce filthy
final fine firm fiscal flaky flat fluffy fluid foggy fond formal fragile frank free fresh friendly frosty
frozen frugal full funny fuzzy gentle genuine giant gifted giddy glad gleaming global glossy golden good
graceful grand granite grateful grave gray greasy great green grim grumpy guilty hairy handsome handy happy
hard harsh hasty heavy hefty helpful hidden high hollow holy honest hopeful horrible huge humble humid hungry
icy ideal idle immense immune inner intense ironic jagged jolly jovial joyful juicy jumbo keen kind knotty
large lasting late lavish lazy lean legal level light likely limp linear liquid little lively local lofty
lonely long loose loud lovely loyal lucky lumpy lunar lush mad magic major mellow merry messy mighty mild
minor misty modern modest moist moral muddy murky mute narrow nasty native neat needy nervous neutral new nice
nimble noble noisy normal noted novel numb nutty obscure odd oily old olive open optimal oral orange orderly
organic outer oval pale paltry patient peaceful perfect petite plain plastic pleasant plump polar polite poor
portable posh precious pretty prickly primary prime proud public pure purple quaint quick quiet radiant rapid
rare raw ready real regal remote rich rigid ripe robust rocky rosy rotten rough round royal rude rural rustic
sacred sad safe salty sandy scarce scary secret secure serene severe shabby shaggy shallow sharp shiny short
shy silent silky silver simple sincere sleepy slim slow small smart smooth snowy soft solar solid somber sour
spare spicy splendid spotless square stable stale steady steep sticky stiff stormy stout strange strict strong
sturdy subtle sudden sunny super sweet swift tall tame tangy tart tender tense terse thick thin thirsty tidy
tight tiny tired torn tough tranquil tropical true twisted ugly ultimate unique upbeat upper urban urgent
useful vacant vague vain valid vast velvet violet visible vital vivid warm wary weak wealthy weary wet white
whole wicked wide wild windy wise witty wooden woolen worthy yellow young zany zealous
""".split())

NOUNS: tuple[str, ...] = tuple("""
acorn actor adult advice agent airport album alley altar amount anchor angle animal ankle answer ant apple
apron arch area arena arm army arrow artist ash attic aunt author autumn avenue award axe baby back badge bag
bakery balance balcony ball balloon band bank banner barn barrel basket bat bath battery beach beam bean bear
beard bed bee beetle bell belt bench berry bicycle bird biscuit blade blanket blossom board boat body bolt
bone book boot border bottle boulder bowl box boy bracelet brain branch brick bridge brook broom brother brush
bucket budget buffalo building bulb bull bundle bunny butter button cabin cabinet cable cactus cafe cage cake
camel camera camp canal candle candy canoe canvas canyon cap captain car card carpet carrot cart castle cat
cattle cave ceiling cellar chain chair chalk channel chapter cheese chef cherry chest chicken chimney chin
circle city clam class clay cliff clock cloth cloud clover coach coal coast coat cobweb coin collar colony
comet compass cookie copper coral cord corner cotton couch country cousin cow crab cradle crane crayon creek
crew cricket crop crow crowd crown crystal cup cupboard curtain cushion daisy dancer deer desk diamond diary
dinner doctor dog doll dolphin donkey door dragon drawer dream dress drum duck dust eagle ear earth eel egg
elbow elephant engine envelope eye fabric face factory fairy falcon farm father feather fence fern ferry field
finger fire fish flag flame flock floor flower flute fog foot forest fork fountain fox frame frog fruit
furnace garage garden garlic gate gem ghost giraffe girl glacier glass glove goat gold goose gorilla grain
grape grass guitar gull hall hammer hand harbor harp hat hawk hay head heart hedge helmet hen herb hill hippo
hive hockey hole honey hook horn horse hose hospital hotel house island ivory jacket jaguar jar jelly jewel
judge juice kettle key kid kingdom kitchen kite kitten knee knife knot ladder lake lamb lamp lantern lawn leaf
lemon lens letter library lily lion lizard lobster lock locket log loom lunch magnet mail mammal mango map
maple marble market mask meadow melon mermaid metal meteor mile mill mirror mitten mole monkey moon moose mop
moss moth motor mountain mouse mouth mud mug muscle museum mushroom music nail napkin neck needle nest net
newt night noodle nose notebook nut oak oar ocean octopus office olive onion orange orbit orchard orchid
ostrich otter oven owl ox oyster paddle page pail paint palace palm pan panda paper parcel park parrot path
peach peacock pear pearl pebble pelican pen pencil penguin pepper piano pickle picnic pie pier pig pigeon
pillow pilot pine pipe pirate pizza planet plant plate plum pocket poem pond pony porch pot potato pottery
powder prince puddle pumpkin puppet puppy quarry queen quill quilt rabbit raccoon radio raft rail rain rainbow
raisin ranch raven razor recipe reef rhino ribbon rice riddle ring river road robin robot rock rocket roof
room rooster root rope rose ruby rug ruler saddle sail salad salmon salt sand sandal saucer scarf school
scissors seal seed shadow shark sheep shelf shell shield ship shirt shoe shovel shrimp silk sink sister skate
skirt skull sky sled sleeve slipper snail snake snow soap sock sofa soil soldier song soup spade sparrow
spider spinach sponge spoon spring squid squirrel stable stage stair stamp star station statue steam stone
stool storm stove straw stream street string submarine sugar suit summer sun swan sweater swing sword table
tail tailor tank teacher teapot tent thread throne thumb ticket tiger timber toast toe tomato tongue tool
tooth torch tortoise towel tower town toy tractor train tray treasure tree truck trumpet tulip tunnel turkey
turnip turtle twig umbrella uncle valley van vase vest village violin volcano wagon wall walnut walrus wand
wardrobe wasp watch water wave wax whale wheat wheel whistle willow window wing winter wire wizard wolf woman
wood wool worm wreath yacht yard yarn zebra zipper
""".split())

VERBS: tuple[str, ...] = tuple("""
accept achieve admire admit adopt advise afford agree allow amuse announce annoy answer apologize appear
applaud approve argue arrange arrive ask attach attack attempt attend attract avoid bake balance ban bang
bathe battle beam beg behave belong bless blink blush boast boil bolt bomb book borrow bounce bow brake
breathe bruise brush bump burn bury buzz calculate call camp care carry carve cause challenge change charge
chase cheat check cheer chew choke chop claim clap clean clear clip close coach collect comb command compare
compete complain complete concentrate concern confess confuse connect consider consist contain continue copy
correct cough count cover crack crash crawl cross crush cry cure curl cycle damage dance dare decay deceive
decide decorate delay delight deliver depend describe desert deserve destroy detect develop disagree disappear
discover dislike divide doubt drag drain dream dress drip drop drown dry dust earn educate embarrass employ
empty encourage end enjoy enter entertain escape examine excite excuse exercise exist expand expect explain
explode extend face fade fail fancy fasten fax fear fence fetch file fill film fire fit fix flap flash float
flood flow fold follow fool force form found frame frighten fry gather gaze glow glue grab grate grease greet
grin grip groan guarantee guard guess guide hammer hand handle hang happen harm hate haunt heal heap heat help
hook hop hope hover hug hum hunt hurry identify ignore imagine impress improve include increase influence
inform inject injure instruct intend interest interfere interrupt introduce invent invite irritate itch jail
jam jog join joke judge juggle jump kick kill kiss kneel knit knock knot label land last laugh launch learn
level license lick lie lighten like list listen live load lock long look love manage march mark marry match
mate matter measure melt memorize mend milk mine miss mix moan moor mourn move muddle mug multiply murder nail
name need nest nod note notice number obey object observe obtain occur offend offer open order overflow owe
own pack paddle paint park part pass paste pat pause peck pedal peel peep perform permit phone pick pinch pine
place plan plant play please plug point poke polish pop possess post pour practice pray preach precede prefer
prepare present preserve press pretend prevent prick print produce program promise protect provide pull pump
punch puncture punish push question queue race radiate rain raise reach realize receive recognize record
reduce reflect refuse regret reign reject rejoice relax release rely remain remember remind remove repair
repeat replace reply report reproduce request rescue retire return rhyme rinse risk rob rock roll rot rub ruin
rule rush sack sail satisfy save saw scare scatter scold scorch scrape scratch scream screw scribble scrub
seal search separate serve settle shade share shave shelter shiver shock shop shrug sigh sign signal sin sip
ski skip slap slip slow smash smell smile smoke snatch sneeze sniff snore snow soak soothe sound spare spark
sparkle spell spill spoil spot spray sprout squash squeak squeal squeeze stain stamp stare start stay steer
step stir stitch stop store strap strengthen stretch strip stroke stuff subtract succeed suck suffer suggest
suit supply support suppose surprise surround suspect suspend switch talk tame tap taste tease telephone tempt
terrify test thank thaw tick tickle tie time tip tire touch tour tow trace trade train transport trap travel
treat tremble trick trip trot trouble trust try tug tumble turn twist type undress unfasten unite unlock
unpack untidy use vanish visit wail wait walk wander want warm warn wash waste watch water wave weigh welcome
whine whip whirl whisper whistle wink wipe wish wobble wonder work worry wrap wreck wrestle wriggle yawn yell
zip zoom
""".split())


def distinct_words() -> list[str]:
    """Every word of the three lists once, in a fixed order (adjectives, nouns, verbs)."""
    return list(dict.fromkeys(ADJECTIVES + NOUNS + VERBS))

"""Word lists for the synthetic tasks (generated once; do not edit by hand).

``WORDS``: 6,556 distinct lowercase English words of 4-12 letters, each used in lowercase at least three
times in Jane Austen's six novels (public domain), minus function words and the words the task templates
use ("special", "magic", "number", "word", "list", ...). The common-words task draws its list from them and
the RULER needle tasks build their keys from them.

``CODE_WORDS``: distinctive nouns for the single needle's secret code word.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = tuple(
    """
abatement abbey abhor abhorred abhorrence abide abilities ability able abode abominable abominably abominate abroad
abrupt abruptly abruptness absence absent absenting absolute absolutely abstain abstraction absurd absurdities
absurdity abundance abundantly abuse abused abusing accent accents accept acceptable acceptance accepted accepting
accession accident accidental accidentally accommodate accompanied accompany accompanying accomplish accomplished
accord accordant according accordingly accosted account accountable accounted accounting accounts accurately
accusation accusations accuse accused accustomary accustomed ached aches aching acknowledge acknowledged acquaint
acquaintance acquainted acquiescence acquire acquired acquirements acquisition acquit acquittal acquitted acre acres
across acted acting action actions active activity actor actors acts actual actually actuated acute acutely
acuteness adapted added addicted adding addition additional additions address addressed addresses addressing adds
adequate adhering adieu adieus adjoining administer admirable admirably admiral admirals admiration admire admired
admirer admires admiring admission admit admittance admitted admitting adopt adopted adoration adorned advance
advanced advancement advances advancing advantage advantageous advantages adventure adventures adverse advertised
advice advisable advise advised adviser advising advocate affability affable affair affairs affect affectation
affected affectedly affecting affection affectionate affections affirmative afflicted affliction affluence afford
afforded affording affords affront affronted afloat afraid afternoon afterwards ages aggravation aghast agitated
agitating agitation agitations agonies agony agree agreeable agreeably agreed agreeing agreement aimed airing airs
airy akin alacrity alarm alarmed alarming alarmingly alarms alas alert alertness alienated alike alive alleviation
alliance alliances allow allowable allowance allowances allowed allowing alloy alluded alluding allusion allusions
almost alone along aloud alphabet already altar alter alteration alterations altered altering alternately
alternative altogether always amazed amazement amazing amazingly ambition ambitious amendment amends amiable amid
amidst amiss amity amongst amount amounting ample amply amuse amused amusement amusements amuses amusing analogy
ancient anecdote anecdotes anew angel anger angrily angry anguish animal animate animated animating animation ankle
ankles annexed annihilation announce announced announcing annuities annuity annum answerable answered answering
answers anticipate anticipated anticipating anticipation anxieties anxiety anxious anxiously anyhow anywhere apace
apart apartment apartments apologies apologise apologised apologising apologize apology apothecary apparent
apparently appeal appealed appearance appearances appearing appeased appetite apple apples application applications
applied apply applying appointed appointment appreciate apprehend apprehended apprehension apprehensive approach
approached approaching approbation appropriate appropriated approval approve approved approving apricot arch archly
archness ardent ardour argue argued arguing argument arguments arise arisen arising arms army arose arrange arranged
arrangement arrangements arranging arrival arrivals arrive arrived arriving arrogance arrowroot artful article
articles articulate artifice artificial artist artless arts ascended ascending ascertain ascertained ascertaining
ashamed ashore aside asked asking asks asleep asparagus aspect aspired assembled assemblies assembling assembly
assent assented assert asserted asserting assertion assertions assiduities assiduous assist assistance assistant
assisted assisting associate associates associations assume assumed assuming assurance assurances assure assured
assuring astonish astonished astonishing astonishment astray asunder atmosphere atone atoned atonement attach
attached attaching attachment attachments attack attacked attacking attacks attainable attained attaining attempt
attempted attempting attempts attend attendance attendant attendants attended attending attention attentions
attentive attentively attic attire attitude attorney attract attracted attraction attractions attractive attribute
attributed attributing audible audience augment augmented augur aunt aunts author authorise authorised authorising
authority authorized autumn avail availed avarice avenue average aversion averted averting avoid avoidance avoided
avoiding avowal avowed avowedly await awake awaken awakened aware away awed awful awkward awkwardness awoke baby
bachelor back backed backgammon background backwards bade bailiff baize baked ball ballroom balls banish banished
bank banners barbarous bare barely bargain baronet baronetcy barouche bars basin basis basket bath bathing bear
bearer bearing bears beat beau beauties beautiful beautifully beauty beaux became become becomes becoming bedroom
beds beer befall befell beforehand befriended began begged begging begin beginning beginnings begins begun behalf
behave behaved behaving behaviour beheld behind behindhand behold beholding beings belief believe believed believes
believing bell belong belonged belonging belongs beloved bench benches bend beneath beneficial benefit benefited
benevolence benevolent bent beside besides bespeak bespoke best bestow bestowed bestowing betray betrayed betraying
better bewildered bewitching beyond bias biased bidding bilious bill billiard bills biographer birds birth biscuits
bits bitter bitterly bitterness black blamable blame blameable blamed blameless blamelessly blaming blank blended
bless blessed blessing blessings blind blinded blindness blinds blockhead blood bloom blooming blow blown blue
blunder blundered blunders blunt blush blushed blushes blushing board boarder boast boasted boasting boat bodies
bodily body boiled bold bolder boldly bone bonnet book bookcase books boot bordered bordering bore born borne borrow
borrowed bosom bottle bottom bought bound bounded bowed bowing bowling bows boxes boys brain branch breach bread
break breakfast breakfasted breaking breast breath breathe breathed breathing breathless bred breeding breeze bride
bridge brief briefly bright brightened brightening brighter brightest brightness brilliancy brilliant bring bringing
brings briskly broad broader broke broken brother brotherly brothers brought brow brown brute build building
buildings built buried burn burning burnt burst bursts bury busily business bustle busy butcher butler butter buying
buzz cabinet cake calculate calculated calculation calculations call called calling calls calm calmer calmly
calmness came camp candid candidly candle candlelight candles candour cant canvassed capabilities capable capacity
capital caprice captain captivate captivating card cards care cared career careful carefully careless carelessly
carelessness cares caring caro carpenter carpet carriage carriages carried carries carry carrying cart carving case
casements cases cash cast castle castles catch catching cattle caught cause causeless causes caution cautious
cautiously cautiousness cavil cease ceased ceaseless ceasing ceiling celebrated cells censure censured centre
ceremonies ceremonious ceremony certain certainly certainty chain chair chairs chaise chamber chambers chance
chanced chances change changed changes changing channel chapel chaplain chapter character characters charade
charades charge charged chariot charitable charity charm charmed charming charmingly charms chat chattering chatty
cheap cheat cheated check checked checking cheek cheeks cheer cheerful cheerfully cheerfulness cheering cheerless
cheese cherish cherished chest chicken chief chiefly child childhood children chimney china choice choose chooses
choosing chose chosen church chuse chuses chusing circle circles circuit circulating circumstance city civil
civilities civility civilly claim claimed claiming claims clamorous class classed classing clean cleaned clear
cleared clearer clearest clearing clearly clearness clemency clergy clergyman clergymen clerk clever cleverer
climate cloak clock close closed closely closer closest closet closets closing cloth clothe clothed clothes cloud
clouded clouds club cluster coach coachman coarse coarseness coat coffee coincidence cold colder coldly coldness
colds collation collect collected collectedly collecting collection colonel colour coloured colouring colours combat
combine come comedy comes comfort comfortable comfortably comforted comfortless comforts comic coming command
commanded commanding commencement commend commendation commended comments commission commissioned commit committed
commodious commonest commonly commonplace communicate communicated compact companion companions company comparative
compare compared comparing comparison comparisons compass compassion compatible competence competent competition
complacency complacently complain complained complaining complains complaint complaints complaisance complaisant
complete completed completely completing completion complexion compliance complied compliment complimented
compliments comply complying compose composed composedly composition composure compounded comprehend comprehended
comprise comprised compromise compunction conceal concealed concealing concealment conceit conceited conceive
conceived conceiving conception concern concerned concerning concerns concert concession conciliating concise
concisely conclude concluded concluding conclusion conclusions concurrence condemn condemnation condemned condescend
condescended condition conditions condolence conduce conduct conducted confederacy conference conferring confess
confessed confessing confession confidant confidante confide confidence confident confidential confiding confine
confined confinement confirm confirmation confirmed confirming conformity confounded confused confusion congratulate
conjecture conjectured conjectures conjecturing conjugal connect connected connection connections connexion
connexions conquer conquered conquest conscience conscious consent consented consenting consequence consequences
consequent consequently consider considerable considerably considerate considered considering considers consisted
consistency consistent consisting consolation consolatory console consoled consoling constancy constant constantly
constitution constrained construction consult consultation consulted consulting consumed consumption contain
contained containing contemplate contemplated contempt contemptible contemptuous contend content contented
contention contentment contents continual continually continuance continue continued continuing contract contracted
contraction contradict contradicted contrary contrast contrasted contribute contributed contributing contrition
contrivance contrive contrived contriving control conundrum convenience conveniences convenient conveniently convent
conversable conversation converse conversed conversing convey conveyed conveying conviction convictions convince
convinced convincing cook cool cooled cooler coolly coolness copied copse copy cordial cordiality cordially corner
corps correct correctly correspond cost cottage cottages cotton cough council counsel counsellor counsels counted
countenance countenances counter counteract counteracted countless countries country county couple couples courage
course courses court courted courteous courtesies courtesy courting courtship cousin cousins covered covering covert
cows coxcomb cravats crayons cream create created creating creation creature creatures credit creditable creditors
creep crept cried crime criminal crisis critical cross crossed crossing crowd crowded crowds crown cruel cruelly
cruelty cruise crying cultivated cultivation cunning curacy curate cure cured curiosity curious curl curricle cursed
curtailed curtain curtains curtsey cushions custom cutting daily damp dance danced dancer dancers dances dancing
danger dangerous dangers dare dared dares daring dark darker darkness darling darted darting dashing date dated
daughter daughters dawdling daylight days dead deaf deal dealing dealings dear dearer dearest dearly dears death
debating debt debts decay decease deceit deceitful deceive deceived deceiving decency decent deception decide
decided decidedly deciding decision decisions decisive declaration declarations declare declared declares declaring
decline declined declining decorum decree deduction deed deemed deep deeper deepest deeply defect defective defects
defence defend defended defer deference deferred defiance deficiencies deficiency deficient defied defined
definition defy degradation degrading degree degrees deigned dejected dejection delay delayed delays deliberately
deliberating deliberation delicacy delicate delicious delight delighted delightful delightfully delights deliver
deliverance delivered delivery delusion demand demanded demanding demands demerits demure denial denied denote
denoted dentist deny denying depart departed departure depend depended dependence dependent depending depends
deplorable deplore deplored deportment deprecated depressed depression deprive deprived deranged derive derived
deriving descend descended descending descent describe described describing descried description descriptions desert
deserted desertion deserts deserve deserved deservedly deserves deserving design designed designing designs
desirable desire desired desires desiring desirous desk desolate despair despaired despatch desperate desperately
desperation despise despised despising despondence desponding dessert destination destined destiny destroy destroyed
destruction detached detaching detail detailed detailing details detain detained detaining detected detecting
detection determine determined determining detest detestable development deviation device devil devise devote
devoted devoting devotion dialogue dictate dictated died dies differ differed difference differences different
differently differing difficult difficulties difficulty diffidence diffident diffuse diffused dignified dignity
dilatory diligence dimensions diminished diminution dine dined dines dining dinner dinners dint direct directed
directing direction directions directly dirt dirty disadvantage disagree disagreeable disagreement disappeared
disappoint disappointed disapprove disapproved discern discerned discerning discernment discharge discharged
discharging discipline disclaimed disclaiming disclosure discompose discomposed discomposure disconcerted discontent
discontented discouraged discourse discover discovered discoveries discovering discovery discredit discreet
discretion discuss discussed discussing discussion disdain disdained disengage disengaged disgrace disgraced
disgraceful disguise disgust disgusted disgusting dish disheartened dishes disinclined dislike disliked disliking
dismal dismay dismissal dismissed disobliging disorder disordered disparity dispatched dispel dispense disperse
dispersed dispirited display displayed displaying displease displeased displeasure disposal dispose disposed
disposing disposition dispositions dispute disquiet disregarded disrespect dissatisfied dissent disservice
dissimilar dissipated dissipation dissolved dissuade distance distant distaste distinct distinction distinctly
distinguish distract distress distressed distresses distressing distrust distrusted disturb disturbance disturbed
diversified diversion diverted diverting divide divided dividing divine division divisions divorce doat dockyard
doctor doctrine doer dogs doings domestic done donkey doomed door doors doted double doubled doubly doubt doubted
doubtful doubting doubtingly doubtless doubts dowager downright downs downstairs dozen dozens drank draper draught
draughts draw drawback drawer drawers drawing drawings drawn draws dread dreaded dreadful dreadfully dreading dream
dreamer dreamt dress dressed dresses dressing drew drink drinking drive driven driving droll drop dropped drops
dropt drove drunk duets duke dull dullest dullness dulness duly dupe duped duplicity durable duration dusk dust
duties dutiful dutifully duty dwell dwelling dwelt dying eager eagerly eagerness earlier earliest early earn earned
earnest earnestly earnestness ears earth earthly ease easier easiest easily easiness east easy eaten eating ebony
eccentric echo echoed eclat economical economy ecstasies ecstasy edge edged edifice edition educated education
effect effecting effects effectual effectually efficacy effort efforts effusion effusions eggs eight eighteen
ejaculation elapsed elasticity elated elation elbow elder elderly eldest elegance elegancies elegant elegantly
elevate elevated elevation eleven eligibility eligible elopement eloquence eloquent elsewhere embarrassed
embarrassing embrace embraced embraces embracing emigrant eminence emotion emotions emphasis employ employed
employing employment employments empty enable enabled enabling enclosed enclosure encounter encourage encouraged
encouraging encroaching encumbered encumbrance endangered endeared endearing endeavour endeavoured endeavouring
endeavours ended ending endless endowed endowments ends endurance endure endured enduring enemies enemy energy
enforced engage engaged engagement engagements engaging engross engrossed enhance enjoy enjoyed enjoying enjoyment
enjoyments enlargement enlightened enliven enlivened enormous enquire enquired enquiries enquiring enquiry enrich
ensue ensued ensuing ensure ensured entail entailed entangled enter entered entering entertain entertained
entertaining enthusiasm entire entirely entitled entrance entreat entreated entreaties entreating entreaty
enumerating enumeration envelope envied environs envy envying equal equality equalled equally equals equipage
equipped equivalent errand errands erred error errors escape escaped escaping escorted especially essay essential
essentially essentials establish established estate estates esteem esteemed esteeming esteems estimable estimate
estimating estimation estranged estrangement eternal etiquette even evening evenings event events eventually
everyday everyone everywhere evidence evident evidently evil evils exact exactly exaggeration examination examine
examined examining example examples exasperate exceed exceeded exceeding exceedingly excel excellence excellent
except excepted excepting exception exceptions excess excesses excessive excessively exchange exchanged excite
excited exciting exclaim exclaimed exclaiming exclamation exclamations exclude excluded exclusively excursion
excusable excuse excused excuses execution exercise exercising exert exerted exerting exertion exertions exhausted
exhibiting exhibition exist existed existence existing exorbitant expect expectation expectations expected expecting
expects expediency expedient expenditure expense expenses expensive experience experienced experiencing expert
explain explained explaining explains explanation explanations explanatory explicit explore exploring expose exposed
exposing exposure express expressed expressing expression expressions expressive expressively expressly exquisite
extend extended extending extension extensive extent extenuation exterior extinction extinguished extorted
extravagance extravagant extreme extremely extremity exultation exulting exultingly eyed eyeing eyes face faced
faces fact facts faded fagged fail failed failing failure failures faint fainter fainting fair fairer fairest fairly
fairy faith faithful faithfully fall fallen falling falls false falsehood faltering fame familiar familiarity
familiarly families family famous fancied fancies fanciful fancy fancying fare farewell farm farmer farmhouse
farmyard farther farthest fascination fashion fashionable fashioned fashions fast fasten faster fastidious fatal
fate fated father fathers fatigue fatigued fatigues fatiguing fault faultless faults faulty favour favourable
favourably favoured favouring favourite favourites favours fear feared fearful fearfully fearing fearless fears
feasible feature features feeble feebleness feed feeding feel feeling feelingly feelings feels feet felicities
felicity fell fellow fellows felt female females feminine fervent fetch fetched fetching fettered fever feverish
fewer fickle fickleness fidelity fidget fidgeted field fields fifteen fifth fifty fight figure figures filial
filigree fill filled filling final finale finally finances find finding finds fine finer finery finest finger
fingers finish finished finishing fire fireplace fires fireside firm firmer firmly firmness first fish fishing
fitted fitting five fixed fixing flannel flat flatter flattered flatteries flattering flattery flavour flew flight
flirt flirtation flirted flirting floor flow flowed flower flowers flowing flown flushed flutter fluttered flying
folded folding follies follow followed following follows folly fond fonder fondest fondly fondness food fool foolish
foolishly foolishness foot footing footman footpath footsteps forbade forbear forbearance forbearing forbid
forbidden forbidding force forced forcibly forcing foreboding forebodings forego foreign foresaw foresee foreseeing
foreseen foresight forestalled foretell foretold forever forfeit forfeited forgave forget forgets forgetting forgive
forgiven forgiveness forgot forgotten forlorn form formal formality formed former formerly formidable forming forms
forte forth fortitude fortnight fortunate fortunately fortune fortunes forty forward forwarded forwarding forwards
foul found foundation founded four fourteen fourth fragrance frame frank frankness fraternal freckles free freedom
freely frequency fresh freshness fret fretfulness friend friendless friendliness friendly friends friendship frigate
fright frighten frightened frightful frivolous front fronted frost frown frozen frugality fruit fruitless fruits
fulfil fulfill fulfilled full fuller fullest fullness fully funeral furnish furnished furniture fury fuss future
gaieties gaiety gaily gain gained gainer gaining gallant gallantries gallantry gallery game games garden gardener
gardeners gardens gate gates gathered gathering gave gayer gaze gazing general generality generally generation
generations generosity generous generously genius genteel gentility gentle gentleman gentlemen gentleness
gentlewoman gently genuine gets getting gift gifted gilding gipsies girl girls give given gives giving glad gladden
gladly glance glanced glances glancing glare glaring glass glasses glee glimpse gloom gloomy gloried glories glory
gloves glow glowing godfather goes going goings gold gone good goodness goodwill goose gossip gout gouty govern
governed governess governing government gown gowns grace graceful graces gracious graciously graciousness gradation
gradations gradual gradually grand grander grandeur grandfather grandmama grandmother grandson grant granted grass
grateful gratefully gratified gratify gratifying gratitude grave gravel gravely graver gravity great greatcoat
greater greatest greatly greatness green greeted grew grey grief grievance grievances grieve grieved grieving
grievous grievously groom gross grossly ground grounded grounds groundwork group groups grove grow growing grown
grows growth grudged gruel guard guarded guardian guardianship guarding guess guessed guessing guest guests guidance
guide guided guiding guilt guilty guinea guineas gust habit habitable habitation habits habitual hackney hackneyed
hair half hall hallooing halves hand handed handkerchief handle hands handsome handsomely handsomer handsomest
handwriting hang hanging happen happened happening happens happier happiest happily happiness happy harangue harbour
harboured hard harden hardened harder hardly hardship hardships harm harmless harmony harp harshly harvest haste
hasten hastened hastening hastily hasty hate hated hateful hates hating hatred haughty haunted hauteur hazard
hazarded hazards head headache headed heads headstrong heal health healthy hear heard hearers hearing hears heart
hearted heartfelt heartily hearts hearty heat heated heath heaven heavenly heavens heavily heavy hedge hedges
heedless height heighten heightened heightening heir heiress heirs held help helped helping helpless henceforth
henceforward hereabouts hereafter heretofore hero heroic heroine heroism hesitate hesitated hesitating hesitatingly
hesitation hesitations hide hideous hiding high higher highest highly hill hills hindrance hint hinted hints hire
hired histories history hither hitherto hoarse hold holding holds hole holiday holidays hollow home homes honest
honestly honesty honour honourable honourably honoured honouring honours hope hoped hopeful hopeless hopes hoping
horizon horrible horribly horrid horror horrors horse horseback horsemen horses horsewoman hospitable hospitality
hotel hour hourly hours house household housekeeper housekeeping housemaid housemaids houses human humanity humble
humbled humiliating humiliation humility humour humoured humouredly humourist humours hundred hundreds hundredth
hung hungry hunt hunters hunting hurried hurry hurrying hurt hurts husband husbands hush hushed hyacinth hypocrite
hysterical hysterics idea ideas idle idleness ignorance ignorant illiberal illiterate illness illnesses image
imaginable imaginary imagination imaginations imagine imagined imagining imbibed imitation immediate immediately
immense immoderately immovable imparted impartial impartiality impartially impassable impatience impatient
impatiently impede impediment impelled impending impenetrable imperfect imperfection imperfectly impertinence
impertinent impetuous implied imply impolitic importance important importunate impose imposed imposing impossible
impressed impression impressions imprisonment improbable improper improperly impropriety improve improved
improvement improvements improver improves improving imprudence imprudent impudence impudent impulse impute imputed
inadequate inattention inattentive incapable incessant incessantly inch inches incivility inclination inclinations
incline inclined include included including income incommoded incompatible inconsistent inconsolable inconstancy
inconstant inconvenient increase increased increasing incredible incredulity incredulous incumbent incurable
incurred indebted indecision indecorum indeed indefinite indelicacy independence independent indication indifference
indifferent indignant indignantly indignation indignity indiscretion indisposed indisputable indistinct individual
individually indolence indolent indubitable induce induced inducement indulge indulged indulgence indulgent
indulging ineffectual inequality inevitable inevitably inexcusable inexperience infamous infamously infamy infancy
infant infatuation infection infer inferior inferiority inferred infinite infinitely infirm inflict inflicted
inflicting influence influenced influencing inform information informed informing informs ingenious ingenuity
ingratitude inhabit inhabitants inhabited inherit inherited inheriting inimitable injudicious injunction injunctions
injure injured injuries injuring injurious injury injustice inmates innate inner innocence innocent innocently inns
innumerable inquietude inquire inquired inquiries inquiring inquiry insensible inside insidious insight insincere
insincerity insinuating insinuations insipid insipidity insist insisted insolence insolent inspection inspire
inspired instance instances instant instantly instead instinct instinctive instruct instruction instructions
instrument insufferable insufferably insufficient insult insulted insulting integrity intellectual intelligence
intelligent intelligible intend intended intending intends intent intention intentions intently interchange
intercourse interest interested interesting interests interfere interference interfering intermediate intermission
internal internally interposed interrupt interrupted interrupting interruption interval intervals interview intimacy
intimate intimately intimates intimation intolerable intreat introduce introduced introducing introduction intrude
intruder intruding intrusion inured invalid invaluable invariable invariably invent inventing invention invitation
invitations invite invited inviting involuntary involve involved involving irksome iron irrational irregular
irremediable irresistible irresolute irritable irritate irritated irritation island issue issued japan jealous
jealousies jealousy jest jewels join joined joining joint jointure joke jokes joking journal journey joyful joyfully
joyous judge judged judgement judges judging judgment judgments judicious judiciously jump jumped jumping junction
junior juster justice justified justify justifying justly justness keen keener keenest keenly keep keeping keeps
kept keys kill killed kind kinder kindest kindly kindness kindred king kingdom kings kiss kissed kitchen knack knave
knees knelt knew knife knives knock knocked knocking knoll know knowing knowledge known knows labour labourers
labouring labours lace ladies lady ladyship laid lain lame lament lamentations lamented lamenting lamp land landau
landed landing landlord lands landscape lane lanes language languid languor large largely larger largest last lasted
lasting lastly late lately later latest latter latterly laudable laugh laughed laughing laughingly laughs laughter
lavender lawn laws lawyer laying lays lazy lead leading leads leaf leaning leant learn learned learning learnt lease
leave leaves leaving lecture left legacy legal legs leisure leisurely lend length lengthen lengthened lengths lent
lessen lessened lessening lesser lesson lessons lest letter letters letting level levity liable liberal liberality
liberally liberties liberty library licence lies lieu lieutenant life lift lifted lifting light lighted lightened
lighter lightly lightness lights like liked likeliest likelihood likely likeness likes likewise liking limbs limited
limits line linen lines linger lingering lips liquor listen listened listener listening lists literally literary
litter little littleness live lived liveliest liveliness lively livery lives living livings lobby local lock locked
lodge lodged lodges lodging lodgings lofty loin loitered lonely long longed longer longest longing look looked
looking looks loose lord lose losing loss losses lost lottery loud louder loudly love loved loveliness lovely lover
lovers loves loving lower lowered lowering lowest lowly lowness luck luckiest luckily lucky lungs lurking luxurious
luxury lying madam madness magnificent magnitude mahogany maid maids main maintain maintained maintaining
maintenance makes making malady male malice malicious mama mamma manage managed management manager mankind manly
manner manners manor mansion mantel mantelpiece manuscript mare mark marked market marking marks marriage marriages
married marries marry marrying massy master masters match matches material materially maternal matrimonial matrimony
matter matters mature maxims meadow meadows meal meals mean meaning meanly meanness means meant meantime meanwhile
measles measure measured measures measuring meat mechanically medical medicine meditate meditated meditating
meditation meditations medium meet meeting meetings meets melancholy member members memento memories memory mend
mental mention mentioned mentioning mercenary merciful mercy mere merely merest merit merited merits merriment merry
mess message messages messenger method methodical middle midnight midshipman midst mighty mild mildness mile miles
military militia million mind minded mindful minds mingled miniature miniatures minute minutely minuteness minutes
minutiae miracle mirth mischance mischief mischievous misconduct miserable miserably misery misfortune misfortunes
misled miss missed missing mistake mistaken mistakes mistress mixed mixing mixture mock mode model moderate
moderately moderation modern modes modest modestly modesty moment momentary moments monarch money monstrous month
months monument mood moonlight moral morality morals moreover morning mornings morrow mortal mortals mortified
mortify mortifying mostly mother motherly mothers motion motionless motive motives motto mount mountains mounted
mourning mouth mouths move moved movement movements moves moving muffin multiplied multitude murmur murmurs music
musical musician musing musings muslin muslins mutton mutual mutually mysterious mysteriously mystery naivete name
named nameless names naming narration narrative narrow narrower narrowly nasty nation native natural naturally
nature natured naval navy near nearer nearest nearly neat neatly neatness necessaries necessarily necessary
necessitous necessity neck necklace need needed needful needless needlessly needlework needs negative neglect
neglected neglecting negligence negligent negotiation neighbour neighbouring neighbours nephew nephews nerves
nervous netting newest newly news newspaper newspapers next nice nicely nicest nicety niece nieces night nights nine
nineteen ninth nnight nobility noble nobly nodded nodding nods noise noises noisy nominal nominally nonsense
nonsensical noon north northern northward note notes nothingness nothings notice noticed noticing notion notions
novel novels novelty nowadays nowhere numerous nuptials nurse nursed nursery nurseryman nursing oaks oath obey
obeyed object objected objecting objection objections objects obligation obligations oblige obliged obliging
obligingly obscurity observance observances observant observation observations observe observed observer observing
obstacle obstacles obstinacy obstinate obtain obtained obtaining obviate occasion occasional occasionally occasioned
occasions occupation occupations occupied occupy occupying occur occurred occurrence occurrences occurring occurs
oddest odious offence offences offend offended offending offense offenses offensive offer offered offering offers
office officer officers offices officious offspring oftener oftenest older oldest olive omission omit omitted ones
oneself open opened opening openly openness operation opinion opinions opportunity oppose opposed opposing opposite
opposition oppress oppressed oppression orchard orchestra ordained order ordered orderly orders ordinary ordination
origin original originally originated ornament ornaments ostensible ostentation ostler otherwise outer outlived
outside outstripped outward outwardly outweigh overbearing overcame overcome overcoming overflowing overhear
overheard overhearing overlook overlooked overpower overpowered overpowering overspread overtaken overthrow
overthrown overtook overtures owed owes owing owned owner owners owning pace paces pacing pack packet packing
paddock page pages paid pain pained painful painfully pains paint painted painter painting pair pale paleness pales
palpably paltry panegyric pang pangs panting papa paper papers parade parading paragraph parcel parcels pardon
pardonable pardoned parent parental parents parish parishioners park parley parliament parlour parsonage part
partake parted partial partiality partially particular particularly particulars parties parting partly partner
partners parts party passable passage passages passed passes passing passion passionately passions passive past
paternal path pathetic patience patient patiently patron patronage patroness pattern pause paused pausing pavement
paying payment pays peace pearls peculiar peculiarity peculiarly pecuniary pelisse penance pencil penetrate
penetrated penetrating penetration penitence penitent penny pens pensive people perceive perceived perceiving
perceptible perception perfect perfection perfections perfectly perforce perform performance performances performed
performer performers performing period periods permanent permanently permission permit permitted perpetual
perpetually perplexed perplexities perplexity perseverance persevere persevered persevering persist persisted
persisting person personage personal personally persons persuadable persuade persuaded persuading persuasion
persuasions pert perturbation perusal perverse perverseness petticoat phaeton pheasants philosophic philosophy phoo
phrase physician piano pianoforte picture pictured pictures picturesque piece pieces pies pillow pink piquet pitch
pitiable pitied pitiful pity pitying place placed places placid placing plague plagued plain plainer plainly
plaintive plaister plan planned planning plans plantation plantations planted plants plate play played player
players playful playfulness playing plays plea plead pleaded pleasant pleasanter pleasantest pleasantly pleasantness
pleasantry please pleased pleases pleasing pleasure pleasures pledged plentiful plenty plunge pocket pockets poet
poetry poignant point pointed pointedly pointer pointing points poison policy polished polite politely politeness
politics pompous pondered pondering ponds ponies pony poor poorly popular popularity populous pork port portion
portrait portraits position positive positively possess possessed possesses possessing possession possessions
possessor possibility possible possibly post posts postscript posture poulterer poultry pounds pour poured poverty
power powered powerful powerless powers practicable practice practices practise practised practising praise praised
praises praising pray prayer prayers preach preacher preaching precaution precede preceded precedence preceding
precious precipitate precise precisely precision predicament predict prefer preferable preference preferment
preferred preferring prejudice prejudiced prejudices premature premises preparation preparations preparatory prepare
prepared preparing prescribed presence present presentation presented presenting presently presents preserve
preserved preserves preserving presided presiding press pressed pressing presume presumed presuming presumption
presumptive pretence pretend pretended pretending pretension pretensions prettier prettiest prettily pretty prevail
prevailed prevailing prevent prevented preventing previous previously prey price pride prime principal principally
principals principle principles print prior prison privacy private privately privations privilege privileged
privileges privy prize prized probability probable probably proceed proceeded proceeding proceedings process
proclaim proclaimed procure procured procuring prodigious prodigiously produce produced produces producing
production productive profess professed professedly professing profession professional professions profile profit
profitable profusion progress prohibited project projected projecting projects prominent promise promised promises
promising promote promoted promoting promotion prompt prompted prompter prone pronounce pronounced pronouncing proof
proofs propensities propensity proper properest properly property proportion proportioned proportions proposal
proposals propose proposed proposing proposition proprietor propriety prose prospect prospects prosperity prosperous
protected protection protege protegee protest protested protesting protracted proud proudly prove proved proverb
proves provide provided providing proving provision provisions provocation provoke provoked provoking proxy prudence
prudent public publication publicity publicly publish pull pulled pulling pulpit pulse pump punctual punctuality
punctually punish punishment pupil puppies puppy purchase purchased purchases pure purely purity purple purport
purpose purposely purposes purse pursue pursued pursuing pursuit pursuits push pushed pushing putrid puts putting
puzzle puzzled puzzling quadrangle quadrille qualified qualities quality quantity quarrel quarrelled quarrelling
quarrelsome quarter quartered quarters queen queer quest questioned questions quick quickened quicker quickest
quickly quickness quiet quieted quieter quietly quietness quit quitted quitting quivering quiz quotations race races
rage raillery rain rained rains raise raised raises raising rallied ramble rambles rambling ramparts random range
rank ranked rant ranting rapid rapidity rapidly rapture raptures rapturous rapturously rare rarely rascal rate rated
rational rationality rationally rattle rays reach reached reaching read reader readers readily readiness reading
reads ready real realised reality really reappeared reason reasonable reasonably reasoned reasoning reasonings
reasons recall recalled receipt receive received receives receiving recent recently reception reciprocal recital
reckon reckoned reckoning recognition recollect recollected recollecting recollection recommenced recommend
recommended recommending reconcile reconciled recourse recover recovered recovering recovery rector rectory recur
recurrence recurring reduced refer reference referred refined refinement reflect reflected reflecting reflection
reflections reform refrain refrained refresh refreshing refreshment refreshments refusal refuse refused refusing
regain regained regard regarded regarding regardless regards regiment regimentals regret regrets regretted
regretting regular regularity regularly regulate regulated regulation regulations rehearsal rehearsals rehearse
rehearsed rehearsing reigns reject rejected rejecting rejection rejoice rejoiced rejoicing rejoined relapse relate
related relates relating relation relations relationship relative release released relenting reliance relied relief
relieve relieved religion religious relinquished relish reluctance reluctant reluctantly relying remain remainder
remained remaining remains remark remarkable remarkably remarks remedy remembered remembering remembrance
remembrances remind reminded reminding remiss remnant remonstrance remorse remote removal removals remove removed
removing rencontre render rendered rendering renewal renewed renewing rent repaid repair repaired repeat repeated
repeatedly repeating repeats repent repentance repetition repetitions repine repining replete replied replies reply
replying report reports repose represent represented representing repress repressed reprimand reproach reproached
reproaches reproaching reprobated reproof reproofs reproved repulsed repulsive reputation reputed request requested
requesting require required requires requiring requisite requited rescue reseated resemblance resembled resent
resented resentful resentfully resenting resentment reserve reserved reserves reside resided residence resident
residing resign resignation resigned resist resistance resisted resisting resolute resolutely resolution resolutions
resolve resolved resolving resorted resources respect respectable respectably respected respectful respecting
respective respects rest rested resting restless restlessness restoration restore restored restoring restrain
restrained restraint restraints restrictions result resulted resulting results resume resumed resuming retain
retained retaining retentive retire retired retirement retiring retort retract retreat retreated retreating retrench
retrospect return returned returning returns revealed revenge reverie reverse reverted review revival revive revived
reviving revolution revolving reward rewarded rheumatic ribbon ribbons rich richer riches richly ridden riddle ride
rides ridicule ridiculous riding right rightly rights ring ringing rings riot rise risen rises rising risk risks
rival rivals river rivet road roads roast robbed robbing rocks rode roll romance romantic roof room rooms rooted
rose roses rough round rouse roused rousing route rubber rude rudeness ruin ruined ruining ruins rule rules rumour
running runs rupture rushed rushing sacrifice sacrificed sacrifices sacrificing saddened sadly sadness safe safely
safer safest safety sagacity said sailed sailor sailors sake sakes salary sale sallow saloon salts salutation
sameness sanction sanctioned sands sang sanguine sank sarcastic sash satin satirical satisfaction satisfactory
satisfied satisfy satisfying saucy save saved saving saying says scale scandalous scanty scarce scarcely scarlet
scattered scene scenery scenes scheme schemes scheming scholar school schoolfellow scissors scold scolded scolding
score scores scorned scoundrel scrape screamed screams screen screened screens scruple scrupled scruples scrupulous
sealed search searched seas season seat seated seating seats seclusion second secondary seconded secondly secrecy
secresy secretly secrets secure secured securing security sedate sedentary seduction seeing seek seeking seem seemed
seeming seemingly seems seen sees seize seized seizing seizure seldom selected self selfish selfishness sell selves
send sending sends seniority sensation sensations sense senses sensibility sensible sensibly sent sentence sentences
sentiment sentiments separate separated separately separating separation separations sequel serenity series serious
seriously seriousness sermon sermons servant servants serve served service serviceable services serving sets setting
settle settled settling seven seventeen seventy several severe severely severity shabby shade shades shadow shady
shake shaken shaking shame shameful shamefully shape share shared sharing shark sharp shawl shed shedding sheet
sheets shelter sheltered shew shewed shewing shewn shews shift shilling shillings shining ship ships shire shivering
shock shocked shocking shoe shoes shook shoot shooting shop shops shore short shorten shorter shortly shortness shot
shoulder shoulders show showed shower showery showing shown shows shrewd shrink shrinking shrubberies shrubbery
shrubs shrunk shut shutters shyness sick sickly sickness side sides sigh sighed sighing sighs sight sighted sights
sign signal signed significant signify signs silence silenced silent silently silk silly silver similar similarity
simple simplest simpleton simplicity simply sincere sincerely sincerity sing singing single singular sink sinking
sinned sins sister sisterly sisters sits sitting situated situation situations sixpence sixteen sixty size sized
skeleton sketch skill skin slave sleep sleeping sleepless slept slice slight slighted slightest slighting
slightingly slightly slipped sloop slope sloping slow slowly slumber slyness small smaller smallest smallness smart
smile smiled smiles smiling smilingly smooth smoothed smoothly smoothness sneering snow snowing snug sober sobs
social society sofa soft soften softened softening softer softly softness soil solace sold soldier sole solely
solemn solemnity solemnly solicit solicitation solicited soliciting solicitous solicitude solicitudes solid solidity
soliloquy solitariness solitary solitude somehow sometimes somewhat somewhere song songs sons soon sooner soothe
soothed soothing sore sorrow sorrowful sorrowfully sorrowing sorrows sorry sort sought soul sound sounded sounds
soup sour source sources south space spacious spare spared sparing sparkling speak speaker speaking speaks species
specimen specimens spectacles speculation speculations speech speeches speechless speed speedily speedy spell spend
spending spent sphere spirit spirited spiritless spirits spite spleen splendid splendour spoil spoiled spoilt spoke
spoken spontaneous sport sporting sports sportsman sportsmen sposo spot spots spotted sprang spread spreading
sprigged spring springing springs spruce sprung spurned square squeeze squire stability stable stables stage
staggered staid staircase stairs stake stamp stamped stand standard standing stands stare stared staring start
started starting startled starts starved state stated stately statement stating station stationed stay stayed
staying stays steadfast steadfastly steadier steadily steadiness steady steep step stepped stepping steps stept
steward stiffness stile still sting stipulation stir stirred stirring stock stockings stole stolen stomach stone
stood stoop stooping stop stopped stopping stopt store stories storm storms stormy story stout stoutly straight
strain straining strange strangely stranger strangers strangest strawberries stream street streets strength
strengthen strengthened strenuously stretch stretched stretching strict strictest strictly strike strikes striking
strikingly string striving stroke stroll strong stronger strongest strongly struck struggle struggled struggles
struggling stubborn studied studies studiously study studying stuff stupid stupidest stupidity sturdy style subdue
subdued subduing subject subjection subjects submission submissive submit submitted submitting subsequent subsided
subsisted subsisting substance substantial substitute succeed succeeded succeeding success successful successfully
succession successive successively sudden suddenly suddenness suffer suffered sufferer suffering sufferings suffers
suffice sufficed sufficiency sufficient sufficiently suggest suggested suggesting suggestion suggestions suit
suitable suitableness suited suits summer summers summit summon summoned summons sung sunk sunshine superadded
superintend superior superiority superseded supper supplanted supplication supplied supply supplying support
supported supporting supports suppose supposed supposing supposition suppress suppressed sure surely surgeon surmise
surmised surmises surpass surpassing surprise surprised surprises surprising surprize surprized surrounded
surrounding survey surveying survive suspect suspected suspecting suspects suspended suspense suspension suspicion
suspicions suspicious suspiciously sustained swallow swallowed sweep sweet sweetest sweetly sweetness sweets swell
swelled swelling swept swiftly syllable syllables sympathetic sympathise sympathy symptom symptoms system table
tables take taken takes taking tale talent talents talk talkative talked talker talking talks tall taller tallest
tame tapestry tart task taste tasted tastes taught teach teachers teaching tear tears tease teased teasing tedious
tediousness teeth tell telling tells temper tempered tempers tempest temple temples temporary tempt temptation
temptations tempted tempting tenant tenants tend tendency tender tenderest tenderly tenderness tending term termed
termination terms terrace terrible terribly terrific terror terrors test testimony tete thank thanked thankful
thankfully thankfulness thanking thanks theatre theatrical theatricals theme thence thereby thick thin thing things
think thinking thinks third thirdly thirteen thirty thither thorough thoroughly thought thoughtful thoughtfully
thoughtless thoughts thousand thousands thread threadbare threatened threatening threats three threw thrill throat
throughout throw throwing thrown thwarted tickets tide tidings tidy tied timber time timed times timid timidity
tippet tire tired tiresome tithes title today together toil toilette toils token told tolerable tolerably tolerate
tolerated tomorrow tone tones tongue tonight took tooth toothpick topic topics torment tormented tormenting torn
torture total totally touch touched touches touching tour toward towards town trace traced traces trade tradesman
tragedy tragic train tranquil tranquillise tranquillity transactions transfer transgressed transient transition
transport travel travelled traveller travellers travelling tray treacherous treachery tread treading treasure
treasures treat treated treating treatment tree trees tremble trembled trembling tremulous trepidation trespass
trial tribute trick tricked tricking tricks tried trifle trifled trifles trifling trim trimming triumph triumphant
triumphantly trivial trodden troop trouble troubled troubles troublesome true truer truest truly trunk trunks trust
trusted trusting truth truths trying tumbling tumult tune turkey turn turned turning turns twelve twelvemonth
twentieth twenty twice twilight twisted twofold tyranny ugly ultimate umbrella umbrellas unabated unable unaffected
unaffectedly unalloyed unalterable unanimous unanswerable unanswered unassuming unattended unavailing unavoidable
unawares unbecoming unbending unbroken unceasing uncertain uncertainty unchanged unchecked uncheerful uncivil uncle
uncles uncommon uncommonly unconcern unconcerned unconnected unconscious unconvinced undeceive undecided undergone
understand understands understood undertake undertaken undertakes undertaking undertook undervalue undervalued
undervoice undeserving undesirable undisturbed undone undoubted undoubtedly undressed undue uneasiness uneasy
unemployed unequal unexpected unexpectedly unfair unfairly unfavourable unfeeling unfeelingly unfeigned unfelt unfit
unfixed unfolded unforgiving unfortunate unfounded unfrequently unfriendly ungenerous ungracious ungrateful
unguarded unhappily unhappiness unhappy unheard uniform uniformly unimportant uninformed union unison unite united
uniting universal universally unjust unkind unkindness unknowingly unknown unless unlike unlikely unlocked unlooked
unluckily unlucky unmanageable unmarked unmerited unmoved unnatural unnecessary unnoticed unobtrusive unpardonable
unpleasant unpleasantly unpleasing unpractised unprejudiced unprepared unpretending unprincipled unprofitable
unpromising unqualified unquiet unreasonable unreasonably unreserve unreserved unrestrained unsafe unsaid unseen
unsettled unshaken unsteadiness unsteady unstudied unsuitable unsuited unsuspected unsuspicious unthought untouched
untoward unused unusual unusually unvarying unwearied unwelcome unwell unwholesome unwilling unwillingly unworthily
unworthy upper uppermost upright uprightness upstairs upstart urge urged urgency urgent urging usage used useful
usefulness useless ushered using usual usually utility utmost utter uttered uttering utterly vacant vague vain
valley valuable valued vanish vanished vanity variation variations varied varieties variety various vary varying
vast vastly vaulted vehemence veil velvet vent venture ventured venturing veracity verdure verses vessel vestibule
vexation vexations vexatious vexed vicarage vice vicinity victory view viewed viewing views vigorous vigorously
vigour vile village villain vindication violation violence violent violently virtue virtues virtuous viscount
visible visibly visions visit visited visiting visitor visitors visits vivacity voice voices void volubility volume
volumes voluntarily voluntary vouch vouchsafe vouchsafed vowed vulgar vulgarity wainscot waistcoat wait waited
waiter waiting waking walk walked walker walking walks wall walls wander wandered wandering want wanted wanting
wanton wants warm warmed warmer warmest warmly warmth warn warrant washing waste wasted wasting watch watched
watches watchful watchfulness watching water watering wavering ways weak weaken weakened weakening weakness wealth
wealthy wear wearied weariness wearing wearisome weary weather wedding week weekly weeks weight welcome welcomed
welcoming welfare well went wept were west western westward whence whereas wherever whichever whilst whims whip
whisper whispered whispering whist white whither whoever whole wholesome wholly whomsoever wicked wickedness wide
widely wider widow widower wife wild wilderness wildly wilful wilfully willed willing willingly willingness wind
winding window windows wine wink winter wisdom wise wisely wiser wisest wish wished wisher wishes wishing withdraw
withdrawing withdrawn withdrew withheld withhold withstand withstood witness witnessed witnesses witnessing wits
witty wives woman womanly women wonder wondered wonderful wonderfully wondering wonders wont wood woods woody worded
wore work worked working workmen works world worldly worlds worn worried worry worse worst worth worthless worthy
wound wounded wounding wrapt wretched wretchedly wretchedness write writer writes writing written wrong wronged
wrote wrought yard yards yawn year yearly years yellow yesterday yield yielded yielding young younger youngest youth
youthful zeal zealous
""".split()
)

CODE_WORDS: tuple[str, ...] = tuple(
    """
saffron turquoise pelican obsidian tangerine walrus marigold cobalt flamingo juniper mango platypus vermilion lynx
basalt pistachio hibiscus narwhal paprika quartz tamarind wombat cinnamon falcon zucchini armadillo magnolia gecko
cardamom jaguar papaya sapphire toucan lavender octopus nutmeg cactus kiwi emerald iguana persimmon walnut caramel
chinchilla dolphin eucalyptus fennel glacier hedgehog indigo jasmine kangaroo lobster meteor nectarine orchid
penguin quinoa raccoon sequoia tortoise umbrella volcano wasabi yak zeppelin anchovy bamboo cranberry dragonfly
espresso firefly gondola harmonica igloo jellyfish koala lantern mongoose nebula origami parsnip rhubarb scorpion
trombone ukulele vanilla whirlpool xylophone yogurt zebra avocado blizzard coconut dynamo eggplant
""".split()
)
